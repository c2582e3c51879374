// The per-value pieces of the CPU kernels (normalize.h, backward_kernels.h): where each
// per-channel array sits in a chunk's coefficients (the forward's and the backward's slots), the
// activations (forward) and their gradients (backward) on vectors and on one value, the forward's
// epilogue act(z (+ residual)), and which outputs both write with streaming stores.
// T is the tensor dtype; A = acc_t<T> (float or double) is the dtype of all arithmetic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../activation.h"
#include "tile_chunks.h"

namespace bnfused::cpu {

// Where the kernels' per-channel arrays sit in their ChannelArrays (see tile_chunks): the
// normalisation's (x - mean) * scale + shift, and the backward's (dx = g * k1 - (x - mean) * k2x - k3),
// whose k1 is that same scale.
constexpr CoefIndex<0> kMean{};
constexpr CoefIndex<1> kScale{}, kK1{};
constexpr CoefIndex<2> kShift{};
constexpr CoefIndex<3> kK2x{};
constexpr CoefIndex<4> kK3{};

template <int Act, typename V>
inline V activate(const V& z, const V& slope) {
  if constexpr (Act == kRelu) {
    return at::vec::maximum(z, V(0));
  } else if constexpr (Act == kLeakyRelu) {
    return V::blendv(z * slope, z, z > V(0));
  } else if constexpr (Act == kRelu6) {
    return at::vec::minimum(at::vec::maximum(z, V(0)), V(6));
  } else if constexpr (Act == kHardswish) {  // torch's own expression, so that it rounds as torch's does
    return z * at::vec::minimum(at::vec::maximum(z + V(3), V(0)), V(6)) / V(6);
  } else if constexpr (Act == kSilu) {  // z * sigmoid(z), written as torch's CPU kernel writes it
    return z / (V(1) + z.neg().exp());
  } else if constexpr (Act == kSigmoid) {  // as torch's vectorised CPU sigmoid
    return V(1) / (V(1) + z.neg().exp());
  } else {
    return z;
  }
}

// dy * act'(z). y_or_z is the saved output y for relu, leaky_relu and relu6 (grad_from_output: y > 0
// exactly where z > 0 for slope >= 0, and 0 < y < 6 exactly where 0 < z < 6), the recomputed z for
// hardswish and silu (grad_from_input); unused without an activation. Torch's conventions at the kinks,
// and at NaN those of its vectorised CPU kernels: relu passes dy ("zero where z <= 0"), leaky_relu
// scales it by the slope ("dy where z > 0"), relu6 gives 0, hardswish NaN.
//
// act_grad_inline is always inlined: the backward's input gradient calls it (for silu and sigmoid,
// GCC 12 otherwise called it out of line in some builds of the pass, its operands through the stack:
// float32 channels_last (32, 256, 14, 14), 1 thread, 0.86 ms against 0.72-0.75); act_grad leaves the
// choice to the compiler, for the sums, whose 24 register accumulators it would otherwise crowd
// (float32 silu backward 2.2 ms against 1.6-1.7).
template <int Act, typename V>
BNFUSED_INLINE V act_grad_inline(const V& dy, const V& y_or_z, const V& slope) {
  if constexpr (Act == kRelu) {
    return V::blendv(dy, V(0), y_or_z <= V(0));
  } else if constexpr (Act == kLeakyRelu) {
    return V::blendv(dy * slope, dy, y_or_z > V(0));
  } else if constexpr (Act == kRelu6) {
    return V::blendv(V(0), dy, (y_or_z > V(0)) & (y_or_z < V(6)));
  } else if constexpr (Act == kHardswish) {  // 0 for z <= -3, z / 3 + 1/2 between, 1 for z >= 3
    const V inner = V::blendv(y_or_z / V(3) + V(0.5), V(1), y_or_z >= V(3));
    return V::blendv(dy * inner, V(0), y_or_z <= V(-3));
  } else if constexpr (Act == kSilu) {  // s * (1 + z * (1 - s)), s = sigmoid(z), as torch's silu_backward
    // The backward recomputes z's exponential in both of its passes, where it costs more than the
    // memory traffic: ATen's faster exp_u20 (float; double's is exp) halves that, for a relative error
    // of about 1e-6 in g (the forward keeps exp(), so that y rounds as torch's silu).
    const V s = V(1) / (V(1) + y_or_z.neg().exp_u20());
    return dy * s * (V(1) + y_or_z * (V(1) - s));
  } else if constexpr (Act == kSigmoid) {  // s * (1 - s), s = sigmoid(z) (exp_u20: see silu)
    const V s = V(1) / (V(1) + y_or_z.neg().exp_u20());
    // exp_u20 does not carry a NaN through (silu's z * (1 - s) does): a NaN z gives a NaN gradient, as torch.
    return V::blendv(dy * (s * (V(1) - s)), y_or_z, y_or_z.isnan());
  } else {
    return dy;
  }
}

template <int Act, typename V>
inline V act_grad(const V& dy, const V& y_or_z, const V& slope) {
  return act_grad_inline<Act>(dy, y_or_z, slope);
}

// The forward's last step on a chunk, shared by every schedule: y = act(z (+ residual)). The residual
// is read at the chunk's own offset (it has x's strides); kResidual keeps the add out of the loops
// that have none.
template <int kAct, bool kResidual, typename T>
struct Epilogue {
  const T* rp;  // the residual, or null
  VecA<T> slope;

  template <typename Tag>
  VecA<T> operator()(Tag tag, int64_t off, const VecA<T>& z) const {
    if constexpr (kResidual) {
      return activate<kAct>(z + ld(tag, rp + off), slope);
    } else {
      return activate<kAct>(z, slope);
    }
  }
};

// float64 kernels take an activation and a residual at run time, chosen per vector (activate_any,
// act_grad_any: one more instantiation of each schedule instead of one per activation and residual),
// with the same operations in the same order, so that the results are the same bits; kAnyAct marks
// them. Plain float64 BatchNorm (no activation, no residual: every unfused module) is compiled as the
// other dtypes are. With the choice a call per vector, and the tile schedule alone, the float64 eval
// forward took 1.2-2.5x ATen's time (1 thread, Zen 4: (64, 16, 8, 8) 44 against 26 us, (64, 6, 24,
// 24) 119 against 71; with relu, 131-161 us against ATen's 71 without); now 17-18 and 45-47 plain,
// 65-68 us with relu.
constexpr int kAnyAct = -1;

template <typename T>
constexpr bool runtime_epilogue() {
  return std::is_same_v<T, double>;
}

// The activation chosen per vector, inlined into the loops (a predictable branch; called, it cost
// more than the vector's arithmetic). with_act's own switch, flattened in (__attribute__((flatten))),
// measured 1.4-2.8x these switches' time (float64 relu backward (64, 6, 24, 24), 1 thread: 587-679 us
// against 237-270).
template <typename V>
BNFUSED_INLINE V activate_any(int64_t act, const V& z, const V& slope) {
  switch (act) {
    case kRelu: return activate<kRelu>(z, slope);
    case kLeakyRelu: return activate<kLeakyRelu>(z, slope);
    case kRelu6: return activate<kRelu6>(z, slope);
    case kHardswish: return activate<kHardswish>(z, slope);
    case kSilu: return activate<kSilu>(z, slope);
    case kSigmoid: return activate<kSigmoid>(z, slope);
    default: return z;
  }
}

template <typename V>
BNFUSED_INLINE V act_grad_any(int64_t act, const V& dy, const V& y_or_z, const V& slope) {
  switch (act) {
    case kRelu: return act_grad<kRelu>(dy, y_or_z, slope);
    case kLeakyRelu: return act_grad<kLeakyRelu>(dy, y_or_z, slope);
    case kRelu6: return act_grad<kRelu6>(dy, y_or_z, slope);
    case kHardswish: return act_grad<kHardswish>(dy, y_or_z, slope);
    case kSilu: return act_grad<kSilu>(dy, y_or_z, slope);
    case kSigmoid: return act_grad<kSigmoid>(dy, y_or_z, slope);
    default: return dy;
  }
}

// Epilogue with the activation and the residual chosen at run time (float64).
template <typename T>
struct AnyEpilogue {
  const T* rp;  // the residual, or null
  VecA<T> slope;
  int64_t act;

  template <typename Tag>
  VecA<T> operator()(Tag tag, int64_t off, const VecA<T>& z) const {
    return activate_any(act, rp ? VecA<T>(z + ld(tag, rp + off)) : z, slope);
  }
};

// Calls f(Epilogue<act, residual present, T>), specialised per activation and residual (float64:
// f(AnyEpilogue<T>) unless there is neither).
template <typename T, typename F>
void with_epilogue(int64_t act, double slope, const T* rp, F&& f) {
  const VecA<T> vslope(static_cast<acc_t<T>>(slope));
  if constexpr (runtime_epilogue<T>()) {
    if (act == kNone && rp == nullptr) {
      f(Epilogue<kNone, false, T>{rp, vslope});
    } else {
      f(AnyEpilogue<T>{rp, vslope, act});
    }
    return;
  }
  with_act(act, [&](auto act_c) {
    constexpr int kAct = decltype(act_c)::value;
    if (rp != nullptr) {
      f(Epilogue<kAct, true, T>{rp, vslope});
    } else {
      f(Epilogue<kAct, false, T>{rp, vslope});
    }
  });
}

// Outputs of at least kStreamBytes are written with streaming stores (see st_out): below it, the
// output (or most of it) can still be in cache when the next layer reads it. Above kStreamMaxBytes
// they are not: glibc's malloc (torch's CPU allocator) maps every block over 32 MiB afresh, and
// the kernel zero-fills each new page on the first store, into cache, where an ordinary store then
// finds it; streamed, the output goes to memory besides. (16, 64, 112, 112) float32 (51 MB), 2
// threads, bench_kernels: eval forward 0.71-0.80 of torch's speed streamed, 1.06-1.10 not;
// training step 0.94-0.99 streamed, 1.22-1.36 not. At 8 MiB the (32, 2048, 7, 7) float32 eval
// forward alone ran 0.80x ATen's time against 1.18-1.31x, but ResNet-50 channels_last (112 px, batch
// 16, Zen 4, 2 threads, three alternated runs) did not follow: eval 0.97-1.06x torch's time against
// 0.98-1.01x at 16 MiB, training 0.97-1.03x against 0.99-1.00x.
constexpr int64_t kStreamBytes = int64_t{16} << 20;
constexpr int64_t kStreamMaxBytes = int64_t{32} << 20;
// Where the last-level cache is smaller than kStreamBytes, an output larger than it cannot wait there
// for the next layer either (read from its start, a tensor larger than an LRU cache misses
// throughout), and an ordinary store first reads each line from memory: such outputs stream from the
// cache's size, but not below kSmallCacheStreamBytes (the size measured). Zen 1 (8 MiB L3), op alone,
// 2 threads, alternated processes (two from 16 MiB, three from 8), from 16 MiB -> from 8 MiB:
// bfloat16 NCHW eval forward of (128, 256, 14, 14) (12.8 MB) 1.95-1.97 -> 1.51-1.60 ms, (32, 64, 56,
// 56) 1.75-1.80 -> 1.45-1.50, training forward 3.08-3.11 -> 2.66-2.76 and 2.34-2.37 -> 2.17-2.24;
// float16 eval 1.88 -> 1.46-1.60 and 1.78-1.85 -> 1.36-1.51; the backwards alike (3.1-4.7 ms).
constexpr int64_t kSmallCacheStreamBytes = int64_t{8} << 20;

// The size from which outputs stream: kStreamBytes, or the L3's size where smaller (see above).
inline int64_t stream_min_bytes() {
  static const int64_t bytes = [] {
    const int64_t l3 = l3_cache_bytes();
    return l3 > 0 ? std::clamp(l3, kSmallCacheStreamBytes, kStreamBytes) : kStreamBytes;
  }();
  return bytes;
}

// Rows (channels innermost) stream only when a row is whole cache lines: otherwise a line would
// mix streamed and ordinary stores (a partial-line streaming write costs more than it saves).
template <typename T>
inline bool streams_output(const Tiling& tl) {
  const int64_t bytes = tl.L.numel() * int64_t(sizeof(T));
  return bytes >= stream_min_bytes() && bytes < kStreamMaxBytes &&
         (!tl.rows || tl.L.c * int64_t(sizeof(T)) % 64 == 0);
}

// Tiles of short planes (a channel's planes n0..n1, each C * S values from the next) write each plane
// apart from its neighbours in memory, which other tiles write at other times: for the same reason
// they stream only when a plane is whole cache lines. Streamed, the 196-value planes of (128, 256,
// 14, 14) float32 (784 bytes) spent about 70% of the backward's input-gradient pass on the streaming
// stores (perf, AVX2), and that backward took 1.1-1.2x ATen's time. Tiles of one plane each stream
// (long planes, and one_plane_tiles, which write the planes in memory order); only whole aligned
// vectors do (st_out), so a cache line that two planes share can take a streamed and an ordinary
// store. The 16-bit backward over one_plane_tiles, streamed, measured faster than the grouped tiles
// unstreamed: bfloat16 (48, 64, 56, 56) and (64, 64, 56, 56), 1 thread, 4.3-5.4 -> 3.6-3.7 ms and
// 6.2-6.4 -> 4.3-4.6 ms.
// Blocks of short planes (plane_block_channels) write each sample's planes of a block as one run, in
// memory order, but keep this rule (not measured streamed: their tensors are mostly under kStreamBytes).
template <typename T>
inline bool tile_streams_output(const Tiling& tl) {
  return streams_output<T>(tl) && (tl.rows || tl.group == 1 || tl.L.s * int64_t(sizeof(T)) % 64 == 0);
}

// g = dy * act'(z) for one value, in double (the exact paths): act_grad on one lane.
// (Not hot: taken per channel only when a tile sum overflowed, so the activation is chosen at run time,
// through with_act: the loops' inlined act_grad_any ordered silu's operands otherwise, which changed
// the sign of the NaN that an inf or NaN input gives here.)
inline double act_grad_value(int64_t act, double dy, double y_or_z, double slope) {
  using V = at::vec::Vectorized<double>;
  double lanes[V::size()];
  const V g = with_act(act, [&](auto act_c) -> V { return act_grad<decltype(act_c)::value>(V(dy), V(y_or_z), V(slope)); });
  g.store(lanes);
  return lanes[0];
}

}  // namespace bnfused::cpu
