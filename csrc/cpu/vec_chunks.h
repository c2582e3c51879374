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

#include <type_traits>

namespace bnfused::cpu {

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
    return VecA<T>::loadu(p, k.n);
  } else {
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
    at::vec::convert_from_float<T>(v, v).store(p, vec_width<float>());
  }
}

template <typename T>
inline void st(Part k, T* p, const VecA<T>& v) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    v.store(p, k.n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, k.n);
  }
}

template <typename T>
inline void st(Gather k, T* p, const VecA<T>& v) {
  acc_t<T> buf[vec_width<acc_t<T>>()];
  v.store(buf);
  for (int64_t i = 0; i < k.n; ++i) p[i * k.es] = static_cast<T>(buf[i]);
}

// Zeroes the lanes past the chunk's end, so that they add nothing to a sum.
template <typename V>
inline V valid(Full, const V& v) {
  return v;
}
template <typename V, typename Tag>
inline V valid(Tag k, const V& v) {
  return V::set(V(0), v, k.n);
}

}  // namespace bnfused::cpu
