// The forward's normalisation on the CPU with known per-channel coefficients:
// y = act((x - mean) * scale + shift (+ residual)), by tiles (normalize_tile, the training forward's
// second pass) or in one pass in memory order (normalize: eval, the normalize op).
// T is the tensor dtype; A = acc_t<T> (float or double) is the dtype of all arithmetic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "elementwise.h"
#include "two_pass.h"

namespace bnfused::cpu {

// mean, scale and shift as normalize_tile reads them over tiling tl: as given, or as arrange()
// arranges them for tl (arranged_size, arrange_channels) once they hold their values.
template <typename T>
class NormalizeCoefs {
  using A = acc_t<T>;

 public:
  NormalizeCoefs(const Tiling& tl, const A* mean, const A* scale, const A* shift)
      : tl_(tl),
        given_{mean, scale, shift},
        size_(arranged_size<T>(tl)),
        arranged_(size_ ? new A[given_.size() * size_] : nullptr) {}  // not zeroed: arrange() writes it whole
  void arrange() {
    if (!size_) return;
    for (size_t i = 0; i < given_.size(); ++i) arrange_channels<T>(tl_, given_[i], arranged_.get() + i * size_);
  }
  ChannelArrays<A, 3> arrays() const {
    if (!size_) return given_;
    return {arranged_.get(), arranged_.get() + size_, arranged_.get() + 2 * size_};
  }

 private:
  const Tiling& tl_;
  ChannelArrays<A, 3> given_;
  int64_t size_;
  std::unique_ptr<A[]> arranged_;
};

// y = epi((x - mean[c]) * scale[c] + shift[c]) on tile t, arrays = {mean, scale, shift} as
// NormalizeCoefs gives them. Subtracting the mean first keeps the result exact when |mean| >> std
// (folding it into the shift would cancel catastrophically). With ahead > 0 each chunk prefetches x
// that many values on (apply_prefetch_ahead).
template <typename T, typename Epi>
void normalize_tile(const T* xp, T* yp, const Tiling& tl, int64_t t, const ChannelArrays<acc_t<T>, 3>& arrays,
                    const Epi& epi, int64_t ahead = 0) {
  const bool stream = tile_streams_output<T>(tl);
  tile_chunks<acc_t<T>, has_pairs<T>()>(
      tl, t, arrays,
      [=](auto tag, int64_t off, auto coef) {
        auto y = [&](auto part) {  // part: the chunk's tag, or one register of a pair
          const auto& cf = coef.at(part);
          return epi(part, off, at::vec::fmadd(ld(part, xp + off) - cf(kMean), cf(kScale), cf(kShift)));
        };
        if (ahead) prefetch_value(xp, off + ahead);
        if constexpr (std::is_same_v<decltype(tag), Pair>) {
          st_pair(yp + off, y(PairLo{}), y(PairHi{}), stream);
        } else {
          st_out(tag, yp + off, y(tag), stream);
        }
      },
      stream, rows_in_pairs<T>(tl));
  stream_fence(stream);
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
          // The whole pairs inside plane p (with at least one of its values after them) in a loop of
          // their own, as the vectors below: checked pair by pair, the loop took 1.37x ATen's time for
          // the float16 eval forward of (8, 64, 28, 28) at 1 thread (Zen 1, in cache).
          const int64_t inside = std::min((left - 1) / (2 * VW), (end - i) / (2 * VW));
          for (const int64_t stop = i + inside * 2 * VW; i < stop; i += 2 * VW) apply_pair(i, m, k, b, m, k, b);
          left -= inside * 2 * VW;
          if (end - i < 2 * VW) break;
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
    NormalizeCoefs<T> coefs(tl, mean, scale, shift);
    coefs.arrange();
    const ChannelArrays<A, 3> arrays = coefs.arrays();
    two_pass(
        tl, sizeof(T), false, true, [](int64_t) {}, [](int64_t, int64_t) {},
        [&](int64_t t) { normalize_tile(xp, yp, tl, t, arrays, epi); });
  });
}

}  // namespace bnfused::cpu
