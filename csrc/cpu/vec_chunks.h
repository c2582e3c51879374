// Vector loads and stores over "chunks" of at most one SIMD vector of elements.
//
// Every CPU kernel walks its tensors in chunks and is written once, for a chunk tag:
//   Full    a whole vector of contiguous elements (the hot path, fully specialised),
//   Part    the n < VW contiguous elements at the end of a run (zero-filled lanes beyond n),
//   Gather  n elements `es` apart (layouts whose spatial stride is not 1 nor the channel stride).
// Values are converted to the accumulation type A (float for half/bfloat16/float, double for
// double) on load and back on store, so the arithmetic never happens in reduced precision.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace bnfused::cpu {

// The pair helpers below are a few instructions each, called once or twice per pair in the hot
// loops; GCC left st_pair<BFloat16> out of line in the backward's row pass, passing its two
// registers through memory (bfloat16 channels_last backward of (32, 64, 56, 56), AVX2: 1.14x the
// time of the same pass chunk by chunk, perf: 16% of the samples in st_pair).
#if defined(__GNUC__)
#define BNFUSED_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define BNFUSED_INLINE __forceinline
#else
#define BNFUSED_INLINE inline
#endif

template <typename T>
using acc_t = at::opmath_type<T>;
template <typename T>
using VecA = at::vec::Vectorized<acc_t<T>>;

struct Full {};
struct Part {
  int64_t n;
};
struct Gather {
  int64_t n, es;
};

template <typename A>
constexpr int64_t vec_width() {
  return at::vec::Vectorized<A>::size();
}

template <typename T>
constexpr bool is_16bit_float() {
  return std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// float16/bfloat16 <-> float one register at a time, with ATen's own conversions (round to nearest
// even, NaN kept): Bits16 holds the 16-bit values of one float vector (16 in a __m256i with AVX512,
// 8 in a __m128i with AVX2). A chunk converts just its own values, where
// at::vec::convert_from_float converts two float vectors into one vector of T (and, for a chunk,
// converts its values twice and stores half the result through a buffer), and a partial chunk is
// loaded and stored in one piece rather than one element at a time.
#if defined(CPU_CAPABILITY_AVX512)
using RawF = __m512;
using Bits16 = __m256i;
inline Bits16 load_bits16(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline void store_bits16(void* p, Bits16 h) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}
inline void stream_bits16(void* p, Bits16 h) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
}
inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}
inline Bits16 load_bits16(const void* p, int64_t n) {
  return _mm256_maskz_loadu_epi16(first_lanes(n), p);
}
inline void store_bits16(void* p, Bits16 h, int64_t n) {
  _mm256_mask_storeu_epi16(p, first_lanes(n), h);
}
#else
using RawF = __m256;
using Bits16 = __m128i;
inline Bits16 load_bits16(const void* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
inline void store_bits16(void* p, Bits16 h) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}
inline void stream_bits16(void* p, Bits16 h) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
}
// The first n values (zeros after them), and a store of the first n: n / 2 whole 32-bit lanes with a
// masked load or store (lanes outside the mask are not touched, so nothing past the n values is
// read or written), and an odd last value on its own. Through a buffer and memcpy instead, a
// 196-value plane's two partial chunks took about half the bfloat16 normalize pass (a store-to-load
// forwarding stall and a library call each).
inline __m128i lanes_below(int64_t words) {
  return _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(words)), _mm_setr_epi32(0, 1, 2, 3));
}
inline Bits16 load_bits16(const void* p, int64_t n) {
  __m128i h = _mm_maskload_epi32(static_cast<const int*>(p), lanes_below(n / 2));
  if (n & 1) {  // the last value: the lower half of lane n / 2
    const int last = static_cast<const uint16_t*>(p)[n - 1];
    const __m128i lane = _mm_cmpeq_epi32(_mm_set1_epi32(static_cast<int>(n / 2)), _mm_setr_epi32(0, 1, 2, 3));
    h = _mm_or_si128(h, _mm_and_si128(lane, _mm_set1_epi32(last)));
  }
  return h;
}
inline void store_bits16(void* p, Bits16 h, int64_t n) {
  _mm_maskstore_epi32(static_cast<int*>(p), lanes_below(n / 2), h);
  if (n & 1) {
    const __m128 moved = _mm_permutevar_ps(_mm_castsi128_ps(h), _mm_set1_epi32(static_cast<int>(n / 2)));
    static_cast<uint16_t*>(p)[n - 1] = static_cast<uint16_t>(_mm_cvtsi128_si32(_mm_castps_si128(moved)));
  }
}
#endif

template <typename T>
inline RawF widen(Bits16 h) {
  RawF out;
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    at::vec::cvtbf16_fp32(h, out);
  } else {
    at::vec::cvtfp16_fp32(h, out);
  }
  return out;
}

template <typename T>
inline Bits16 narrow(const RawF& v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return at::vec::cvtfp32_bf16(v);
  } else {
    return at::vec::cvtfp32_fp16(v);
  }
}
#define BNFUSED_HAS_BITS16 1
#endif

#if defined(CPU_CAPABILITY_AVX2)
// The mask of a float or double vector's first n lanes, for _mm256_maskload / _mm256_maskstore.
template <typename T>
inline __m256i first_lanes_avx2(int64_t n) {
  if constexpr (std::is_same_v<T, double>) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  } else {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
}
#endif

template <typename T>
inline VecA<T> ld(Full, const T* p) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return VecA<T>::loadu(p);
  } else {
    at::vec::Vectorized<float> v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

template <typename T>
inline VecA<T> ld(Part k, const T* p) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
#if defined(CPU_CAPABILITY_AVX2)
    // A masked load (ATen's partial loadu goes through a buffer and memcpy with AVX2; see load_bits16).
    if constexpr (std::is_same_v<T, float>) return _mm256_maskload_ps(p, first_lanes_avx2<T>(k.n));
    if constexpr (std::is_same_v<T, double>) return _mm256_maskload_pd(p, first_lanes_avx2<T>(k.n));
#endif
    return VecA<T>::loadu(p, k.n);
  } else {
#if defined(BNFUSED_HAS_BITS16)
    if constexpr (is_16bit_float<T>()) return widen<T>(load_bits16(p, k.n));
#endif
    acc_t<T> buf[vec_width<acc_t<T>>()] = {};
    for (int64_t i = 0; i < k.n; ++i) buf[i] = static_cast<acc_t<T>>(p[i]);
    return VecA<T>::loadu(buf);
  }
}

template <typename T>
inline VecA<T> ld(Gather k, const T* p) {
  acc_t<T> buf[vec_width<acc_t<T>>()] = {};
  for (int64_t i = 0; i < k.n; ++i) buf[i] = static_cast<acc_t<T>>(p[i * k.es]);
  return VecA<T>::loadu(buf);
}

template <typename T>
inline void st(Full, T* p, const VecA<T>& v) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    v.store(p);
  } else {
#if defined(BNFUSED_HAS_BITS16)
    if constexpr (is_16bit_float<T>()) {
      store_bits16(p, narrow<T>(v));
      return;
    }
#endif
    at::vec::convert_from_float<T>(v, v).store(p, vec_width<float>());
  }
}

template <typename T>
inline void st(Part k, T* p, const VecA<T>& v) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) return _mm256_maskstore_ps(p, first_lanes_avx2<T>(k.n), v);
    if constexpr (std::is_same_v<T, double>) return _mm256_maskstore_pd(p, first_lanes_avx2<T>(k.n), v);
#endif
    v.store(p, k.n);
  } else {
#if defined(BNFUSED_HAS_BITS16)
    if constexpr (is_16bit_float<T>()) {
      store_bits16(p, narrow<T>(v), k.n);
      return;
    }
#endif
    at::vec::convert_from_float<T>(v, v).store(p, k.n);
  }
}

template <typename T>
inline void st(Gather k, T* p, const VecA<T>& v) {
  acc_t<T> buf[vec_width<acc_t<T>>()];
  v.store(buf);
  for (int64_t i = 0; i < k.n; ++i) p[i * k.es] = static_cast<T>(buf[i]);
}

// Streaming (non-temporal) stores, for outputs too large to stay in cache: an ordinary store first
// reads the line it writes into cache ("read for ownership"), so writing a tensor moves its bytes
// twice; a streaming store writes whole lines straight to memory. On large outputs this makes a
// write pass markedly cheaper even counting the next reader, which then finds the data in memory
// rather than in cache (a hand-written probe on this project's 2-core CI machine: writing 25.7 MB
// then reading it back took 3.9-4.1 ms streamed against 5.2 ms stored; from 4 MB down, ordinary
// stores won). Only whole, aligned vectors stream; everything else takes the ordinary store.
// A tile that streamed must end with stream_fence() (streaming stores are weakly ordered).
template <typename Tag, typename T>
inline void st_out(Tag tag, T* p, const VecA<T>& v, bool stream) {
  if constexpr (std::is_same_v<Tag, Full>) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
    constexpr uintptr_t kLine = 64;  // the full vector, for float and double
#else
    constexpr uintptr_t kLine = 32;
#endif
    if (stream && reinterpret_cast<uintptr_t>(p) % (std::is_same_v<T, acc_t<T>> ? kLine : kLine / 2) == 0) {
      if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
        _mm512_stream_ps(p, v);
#else
        _mm256_stream_ps(p, v);
#endif
      } else if constexpr (std::is_same_v<T, double>) {
#if defined(CPU_CAPABILITY_AVX512)
        _mm512_stream_pd(p, v);
#else
        _mm256_stream_pd(p, v);
#endif
      } else {  // half / bfloat16
        stream_bits16(p, narrow<T>(v));
      }
      return;
    }
#endif
  }
  (void)stream;
  st(tag, p, v);
}

// Asks for the cache line holding p (a hint: never faults, whatever p is).
inline void prefetch_line(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#elif defined(_M_X64) || defined(_M_IX86)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#endif
}

// prefetch_line for the byte `bytes` on from p, which may lie past the end of p's tensor (the next
// channel's place, read from the last channel): the address is formed as an integer, since a pointer
// beyond the tensor is out of bounds in C++ even when nothing reads through it.
inline void prefetch_byte(const void* p, int64_t bytes) {
  prefetch_line(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes)));
}

// prefetch_byte for the value `index` values on from p.
template <typename T>
inline void prefetch_value(const T* p, int64_t index) {
  prefetch_byte(p, index * int64_t(sizeof(T)));
}

// Orders a tile's streaming stores before whatever the thread does next (a task's end included).
inline void stream_fence(bool streamed) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (streamed) _mm_sfence();
#else
  (void)streamed;
#endif
}

// Pairs: the 2 * VW 16-bit values of one 512-bit (AVX512) or 256-bit (AVX2) register, loaded,
// converted and stored at once, in two VecA<T> registers `lo` and `hi` (elsewhere, and for
// float/double, a pair is two consecutive whole vectors, lo then hi). An elementwise pass computes
// each value in whichever lane holds it, so the results are the same bits as chunk by chunk; what it
// saves is conversion work, which outweighs the memory traffic of a 16-bit pass converted a vector
// at a time.
//   bfloat16: lo holds the pair's even values, hi its odd ones. A bfloat16 is the upper half of a
//             float, so widening a 32-bit lane that holds two of them is one shift (the even value)
//             or one mask (the odd one), and narrowing is narrow_pair_bf16's rounding, which works
//             on both values of a lane at once where the one-register conversion rounds each float
//             and then packs and permutes the halves together.
//   float16:  lo holds the first VW values, hi the last VW (vcvtph2ps and vcvtps2ph, as chunks do).
// pair_index(lane) says which value of the pair a lane holds, for the lanes of lo and hi.
template <typename T>
constexpr bool has_pairs() {
#if defined(BNFUSED_HAS_BITS16)
  return is_16bit_float<T>();
#else
  return false;
#endif
}

// Pair: the chunk tag of a pair, which elementwise walks opt into (see walk_run). PairLo, PairHi:
// its two registers, for loads of each tensor with the pair's layout: ld(PairLo{}, p) is the lo
// register of the pair at p, ld(PairHi{}, p) its hi.
struct Pair {};
struct PairLo {};
struct PairHi {};

#if defined(CPU_CAPABILITY_AVX512)
using RawPair = __m512i;
BNFUSED_INLINE RawPair load_pair_bits(const void* p) {
  return _mm512_loadu_si512(p);
}
#elif defined(CPU_CAPABILITY_AVX2)
using RawPair = __m256i;
BNFUSED_INLINE RawPair load_pair_bits(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
#endif

template <typename T>
BNFUSED_INLINE void ld_pair(const T* p, VecA<T>& lo, VecA<T>& hi) {
#if defined(BNFUSED_HAS_BITS16)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const RawPair w = load_pair_bits(p);
#if defined(CPU_CAPABILITY_AVX512)
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
#else
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
#endif
    return;
  }
#endif
  lo = ld(Full{}, p);
  hi = ld(Full{}, p + vec_width<acc_t<T>>());
}

// The 2 * VW bfloat16 of (lo, hi) in pair order, each rounded as at::vec::cvtfp32_bf16 rounds (to
// nearest even; any NaN becomes 0xFFFF): the same bits. A float's upper half, the truncated value,
// rounds up (adds 1, carrying into the exponent as the float rounding does) when its lower half plus
// the upper half's last bit exceeds 0x8000, which is computed on 16-bit words, two values per 32-bit
// lane; the NaN fix-up costs one compare unless a NaN is present.
#if defined(CPU_CAPABILITY_AVX512)
BNFUSED_INLINE __m512i narrow_pair_bf16(const __m512& lo, const __m512& hi) {
  const __m512i e = _mm512_castps_si512(lo), o = _mm512_castps_si512(hi);
  const __m512i upper_words = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  // (a & upper_words) | (b & ~upper_words)
  constexpr int kSelect = 0xE4;
  const __m512i upper = _mm512_ternarylogic_epi32(o, _mm512_srli_epi32(e, 16), upper_words, kSelect);
  const __m512i lower = _mm512_ternarylogic_epi32(_mm512_slli_epi32(o, 16), e, upper_words, kSelect);
  const __m512i last_bit = _mm512_and_si512(upper, _mm512_set1_epi16(1));
  const __mmask32 up = _mm512_cmpgt_epu16_mask(_mm512_adds_epu16(lower, last_bit), _mm512_set1_epi16(0x8000));
  __m512i out = _mm512_mask_sub_epi16(upper, up, upper, _mm512_set1_epi16(-1));
  if (_mm512_cmp_ps_mask(lo, hi, _CMP_UNORD_Q) != 0) {
    out = _mm512_mask_or_epi32(out, _mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q), out, _mm512_set1_epi32(0xFFFF));
    out = _mm512_mask_or_epi32(out, _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q), out, upper_words);
  }
  return out;
}
#elif defined(CPU_CAPABILITY_AVX2)
BNFUSED_INLINE __m256i narrow_pair_bf16(const __m256& lo, const __m256& hi) {
  const __m256i e = _mm256_castps_si256(lo), o = _mm256_castps_si256(hi);
  // Blend mask 0x55: the even 16-bit words (each lane's lower half) from the second operand.
  const __m256i upper = _mm256_blend_epi16(o, _mm256_srli_epi32(e, 16), 0x55);
  const __m256i lower = _mm256_blend_epi16(_mm256_slli_epi32(o, 16), e, 0x55);
  const __m256i last_bit = _mm256_and_si256(upper, _mm256_set1_epi16(1));
  // Unsigned w > 0x8000 is signed (w ^ 0x8000) > 0 (AVX2 compares 16-bit words signed only).
  const __m256i sign = _mm256_set1_epi16(static_cast<short>(0x8000));
  const __m256i up = _mm256_cmpgt_epi16(_mm256_xor_si256(_mm256_adds_epu16(lower, last_bit), sign), _mm256_setzero_si256());
  __m256i out = _mm256_sub_epi16(upper, up);  // up is -1 where the value rounds up
  if (_mm256_movemask_ps(_mm256_cmp_ps(lo, hi, _CMP_UNORD_Q)) != 0) {
    const __m256i nan_lo = _mm256_castps_si256(_mm256_cmp_ps(lo, lo, _CMP_UNORD_Q));
    const __m256i nan_hi = _mm256_castps_si256(_mm256_cmp_ps(hi, hi, _CMP_UNORD_Q));
    out = _mm256_or_si256(out, _mm256_and_si256(nan_lo, _mm256_set1_epi32(0xFFFF)));
    out = _mm256_or_si256(out, _mm256_and_si256(nan_hi, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  return out;
}
#endif

// ld(PairLo{}, p), ld(PairHi{}, p): one register of the pair at p.
template <typename T, typename Half,
          typename = std::enable_if_t<std::is_same_v<Half, PairLo> || std::is_same_v<Half, PairHi>>>
BNFUSED_INLINE VecA<T> ld(Half, const T* p) {
  constexpr bool kHi = std::is_same_v<Half, PairHi>;
  if constexpr (std::is_same_v<T, at::BFloat16> && has_pairs<T>()) {
    VecA<T> lo, hi;
    ld_pair(p, lo, hi);
    return kHi ? hi : lo;
  }
  return ld(Full{}, kHi ? p + vec_width<acc_t<T>>() : p);
}

// Stores a pair, streaming (see st_out) when asked and aligned.
template <typename T>
BNFUSED_INLINE void st_pair(T* p, const VecA<T>& lo, const VecA<T>& hi, bool stream) {
#if defined(BNFUSED_HAS_BITS16)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const auto out = narrow_pair_bf16(lo, hi);
    if (stream && reinterpret_cast<uintptr_t>(p) % sizeof(out) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), out);
    } else {
      _mm512_storeu_si512(p, out);
#else
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), out);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), out);
#endif
    }
    return;
  }
#endif
  st_out(Full{}, p, lo, stream);
  st_out(Full{}, p + vec_width<acc_t<T>>(), hi, stream);
}

// The index in the pair (0 .. 2 * VW - 1) of the value that lane `lane` holds, counting lo's lanes
// (0 .. VW - 1) then hi's (VW .. 2 * VW - 1).
template <typename T>
constexpr int64_t pair_value(int64_t lane) {
  constexpr int64_t VW = vec_width<acc_t<T>>();
  if constexpr (std::is_same_v<T, at::BFloat16> && has_pairs<T>()) {
    return lane < VW ? 2 * lane : 2 * (lane - VW) + 1;
  }
  return lane;
}

// The index in the pair (0 .. 2 * VW - 1) of the value each lane of lo (first) and hi (second) holds.
template <typename T>
inline std::pair<VecA<T>, VecA<T>> pair_index() {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<T, at::BFloat16> && has_pairs<T>()) {
    return {VecA<T>::arange(A(0), A(2)), VecA<T>::arange(A(1), A(2))};
  }
  return {VecA<T>::arange(A(0), A(1)), VecA<T>::arange(A(vec_width<A>()), A(1))};
}

// A chunk's K contributions to tile_sums, as the std::array it takes. Filled by assignment: built
// from a braced list, the array stayed on the stack where GCC 12 stored the first contribution for
// every vector of the row sums kept in memory (a third store per vector beside the two sums').
template <typename V, typename... Rest>
inline std::array<V, 1 + sizeof...(Rest)> contributions(const V& first, const Rest&... rest) {
  static_assert((std::is_same_v<Rest, V> && ...), "every contribution is a vector of the first's type");
  std::array<V, 1 + sizeof...(Rest)> out;
  size_t k = 0;
  out[k++] = first;
  ((out[k++] = rest), ...);
  return out;
}

// Zeroes the lanes past the chunk's end, so that they add nothing to a sum. A blend under a lane
// mask, which inlines: V::set(V(0), v, n) is an out-of-line call for n < VW with AVX512, which took
// its operands through the stack once per partial chunk (a row's last, where C is not whole vectors).
template <typename V>
inline V valid(Full, const V& v) {
  return v;
}
template <typename V>
inline V valid(PairLo, const V& v) {
  return v;
}
template <typename V>
inline V valid(PairHi, const V& v) {
  return v;
}
template <typename V, typename Tag>
inline V valid(Tag k, const V& v) {
  using A = typename V::value_type;
  return V::blendv(V(0), v, V::arange(A(0), A(1)) < V(A(k.n)));
}

}  // namespace bnfused::cpu
